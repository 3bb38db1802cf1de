"""The phrasebook grammar: parallel English, Spanish and French sentences from one meaning.

A sentence is first drawn as a language-free meaning (a template and its slots: which noun,
adjective, verb, number, place), then realised in each language by that language's rules,
so the three texts are translations of each other while their surface differs the way real
languages do:

* adjective position: English before the noun; Spanish after it; French after it except
  the short "BAGS" adjectives (petit, grand, vieux, beau, ...), which go before;
* gender and number agreement of articles and adjectives (la casa blanca, les petites
  maisons), with French elision (l'oiseau, j'achète), contraction (du, del, au) and the
  French masculine forms before a vowel (bel, vieil, nouvel);
* Spanish drops the subject pronoun (Quiero dos manzanas rojas), French inverts nothing
  but says "il y a" where Spanish says "hay" and English "there are".

Vocabulary tables are whitespace-separated columns so a linguist can read and extend them.
"""

from __future__ import annotations

import random
import unicodedata
from dataclasses import dataclass
from functools import cache, lru_cache

LANGUAGES = ("en", "es", "fr")


@dataclass(frozen=True)
class Noun:
    kind: str  # animal, person, thing, food or place
    forms: dict  # lang -> (singular, plural)
    gender: dict  # lang -> "m" or "f" (English "n")
    support: bool  # something you can put things on or under (a table, a bed)

    @property
    def animate(self) -> bool:
        return self.kind in ("animal", "person")


@dataclass(frozen=True)
class Adjective:
    scope: str  # any, animate or object: which nouns it can describe
    forms: dict  # lang -> (m sg, f sg, m pl, f pl)
    french_before: bool  # a French BAGS adjective: goes before the noun
    french_vowel_form: str | None  # bel / vieil / nouvel before a vowel-initial masculine noun
    state: bool  # a passing state: Spanish predicates it with estar (está sucio), not ser

    def fits(self, noun: Noun) -> bool:
        return self.scope == "any" or (self.scope == "animate") == noun.animate


@dataclass(frozen=True)
class Verb:
    scope: str  # intransitive verbs: "animate" or "person" subjects; transitive verbs: "object"
    forms: dict  # lang -> (singular form, plural form): 3rd person (intransitive) or 1st person (transitive)


@dataclass(frozen=True)
class SentenceTriple:
    """One meaning in the three languages, with the content words a word-clip task can label."""

    sentence_id: str
    texts: dict[str, str]
    keywords: dict[str, tuple[str, ...]]


# kind    English sg/pl        Spanish sg/pl gender         French sg/pl gender    [support]
_NOUN_TABLE = """
animal  dog/dogs               perro/perros m               chien/chiens m
animal  cat/cats               gato/gatos m                 chat/chats m
animal  bird/birds             pájaro/pájaros m             oiseau/oiseaux m
animal  horse/horses           caballo/caballos m           cheval/chevaux m
animal  cow/cows               vaca/vacas f                 vache/vaches f
animal  fish/fish              pez/peces m                  poisson/poissons m
animal  mouse/mice             ratón/ratones m              souris/souris f
animal  rabbit/rabbits         conejo/conejos m             lapin/lapins m
animal  duck/ducks             pato/patos m                 canard/canards m
animal  sheep/sheep            oveja/ovejas f               mouton/moutons m
animal  goat/goats             cabra/cabras f               chèvre/chèvres f
animal  frog/frogs             rana/ranas f                 grenouille/grenouilles f
animal  bear/bears             oso/osos m                   ours/ours m
animal  wolf/wolves            lobo/lobos m                 loup/loups m
animal  pig/pigs               cerdo/cerdos m               cochon/cochons m
animal  hen/hens               gallina/gallinas f           poule/poules f
animal  monkey/monkeys         mono/monos m                 singe/singes m
animal  lion/lions             león/leones m                lion/lions m
animal  tiger/tigers           tigre/tigres m               tigre/tigres m
animal  snake/snakes           serpiente/serpientes f       serpent/serpents m
animal  turtle/turtles         tortuga/tortugas f           tortue/tortues f
animal  elephant/elephants     elefante/elefantes m         éléphant/éléphants m
animal  bee/bees               abeja/abejas f               abeille/abeilles f
animal  spider/spiders         araña/arañas f               araignée/araignées f
person  man/men                hombre/hombres m             homme/hommes m
person  woman/women            mujer/mujeres f              femme/femmes f
person  boy/boys               niño/niños m                 garçon/garçons m
person  girl/girls             niña/niñas f                 fille/filles f
person  teacher/teachers       profesor/profesores m        professeur/professeurs m
person  doctor/doctors         médico/médicos m             médecin/médecins m
person  baker/bakers           panadero/panaderos m         boulanger/boulangers m
person  farmer/farmers         granjero/granjeros m         fermier/fermiers m
person  neighbour/neighbours   vecino/vecinos m             voisin/voisins m
person  friend/friends         amigo/amigos m               ami/amis m
person  king/kings             rey/reyes m                  roi/rois m
person  queen/queens           reina/reinas f               reine/reines f
person  student/students       estudiante/estudiantes m     étudiant/étudiants m
person  singer/singers         cantante/cantantes m         chanteur/chanteurs m
person  cook/cooks             cocinero/cocineros m         cuisinier/cuisiniers m
thing   book/books             libro/libros m               livre/livres m
thing   table/tables           mesa/mesas f                 table/tables f            support
thing   chair/chairs           silla/sillas f               chaise/chaises f          support
thing   car/cars               coche/coches m               voiture/voitures f        support
thing   ball/balls             pelota/pelotas f             balle/balles f
thing   cup/cups               taza/tazas f                 tasse/tasses f
thing   bag/bags               bolso/bolsos m               sac/sacs m
thing   box/boxes              caja/cajas f                 boîte/boîtes f            support
thing   key/keys               llave/llaves f               clé/clés f
thing   lamp/lamps             lámpara/lámparas f           lampe/lampes f
thing   bottle/bottles         botella/botellas f           bouteille/bouteilles f
thing   hat/hats               sombrero/sombreros m         chapeau/chapeaux m
thing   shoe/shoes             zapato/zapatos m             chaussure/chaussures f
thing   shirt/shirts           camisa/camisas f             chemise/chemises f
thing   clock/clocks           reloj/relojes m              horloge/horloges f
thing   pen/pens               bolígrafo/bolígrafos m       stylo/stylos m
thing   letter/letters         carta/cartas f               lettre/lettres f
thing   window/windows         ventana/ventanas f           fenêtre/fenêtres f
thing   door/doors             puerta/puertas f             porte/portes f
thing   bed/beds               cama/camas f                 lit/lits m                support
thing   bicycle/bicycles       bicicleta/bicicletas f       vélo/vélos m
thing   boat/boats             barco/barcos m               bateau/bateaux m
thing   plate/plates           plato/platos m               assiette/assiettes f
thing   knife/knives           cuchillo/cuchillos m         couteau/couteaux m
thing   umbrella/umbrellas     paraguas/paraguas m          parapluie/parapluies m
thing   flower/flowers         flor/flores f                fleur/fleurs f
thing   tree/trees             árbol/árboles m              arbre/arbres m            support
thing   stone/stones           piedra/piedras f             pierre/pierres f
thing   picture/pictures       cuadro/cuadros m             tableau/tableaux m
thing   phone/phones           teléfono/teléfonos m         téléphone/téléphones m
thing   computer/computers     ordenador/ordenadores m      ordinateur/ordinateurs m
thing   candle/candles         vela/velas f                 bougie/bougies f
thing   mirror/mirrors         espejo/espejos m             miroir/miroirs m
thing   basket/baskets         cesta/cestas f               panier/paniers m
thing   ring/rings             anillo/anillos m             bague/bagues f
thing   coat/coats             abrigo/abrigos m             manteau/manteaux m
thing   bench/benches          banco/bancos m               banc/bancs m              support
food    apple/apples           manzana/manzanas f           pomme/pommes f
food    cake/cakes             pastel/pasteles m            gâteau/gâteaux m
food    egg/eggs               huevo/huevos m               œuf/œufs m
food    orange/oranges         naranja/naranjas f           orange/oranges f
food    lemon/lemons           limón/limones m              citron/citrons m
food    cheese/cheeses         queso/quesos m               fromage/fromages m
food    banana/bananas         plátano/plátanos m           banane/bananes f
food    tomato/tomatoes        tomate/tomates m             tomate/tomates f
food    pear/pears             pera/peras f                 poire/poires f
food    cookie/cookies         galleta/galletas f           biscuit/biscuits m
food    carrot/carrots         zanahoria/zanahorias f       carotte/carottes f
food    strawberry/strawberries  fresa/fresas f             fraise/fraises f
food    melon/melons           melón/melones m              melon/melons m
place   house/houses           casa/casas f                 maison/maisons f
place   garden/gardens         jardín/jardines m            jardin/jardins m
place   kitchen/kitchens       cocina/cocinas f             cuisine/cuisines f
place   school/schools         escuela/escuelas f           école/écoles f
place   park/parks             parque/parques m             parc/parcs m
place   street/streets         calle/calles f               rue/rues f
place   shop/shops             tienda/tiendas f             magasin/magasins m
place   church/churches        iglesia/iglesias f           église/églises f
place   station/stations       estación/estaciones f        gare/gares f
place   market/markets         mercado/mercados m           marché/marchés m
place   forest/forests         bosque/bosques m             forêt/forêts f
place   river/rivers           río/ríos m                   rivière/rivières f
place   beach/beaches          playa/playas f               plage/plages f
place   city/cities            ciudad/ciudades f            ville/villes f
place   hotel/hotels           hotel/hoteles m              hôtel/hôtels m
place   hospital/hospitals     hospital/hospitales m        hôpital/hôpitaux m
place   library/libraries      biblioteca/bibliotecas f     bibliothèque/bibliothèques f
place   office/offices         oficina/oficinas f           bureau/bureaux m
place   room/rooms             habitación/habitaciones f    chambre/chambres f
place   bridge/bridges         puente/puentes m             pont/ponts m
place   farm/farms             granja/granjas f             ferme/fermes f
"""

# scope    English    Spanish m/f/mpl/fpl (or sg/pl)          French m/f/mpl/fpl              [flags]
# flags: before[:vowel form] = a French adjective placed before the noun; state = Spanish says estar, not ser
_ADJECTIVE_TABLE = """
any      small      pequeño/pequeña/pequeños/pequeñas         petit/petite/petits/petites       before
any      big        grande/grandes                            grand/grande/grands/grandes       before
any      old        viejo/vieja/viejos/viejas                 vieux/vieille/vieux/vieilles      before:vieil
any      new        nuevo/nueva/nuevos/nuevas                 nouveau/nouvelle/nouveaux/nouvelles  before:nouvel
any      beautiful  bonito/bonita/bonitos/bonitas             beau/belle/beaux/belles           before:bel
any      pretty     lindo/linda/lindos/lindas                 joli/jolie/jolis/jolies           before
any      red        rojo/roja/rojos/rojas                     rouge/rouge/rouges/rouges
any      blue       azul/azules                               bleu/bleue/bleus/bleues
any      green      verde/verdes                              vert/verte/verts/vertes
any      white      blanco/blanca/blancos/blancas             blanc/blanche/blancs/blanches
any      black      negro/negra/negros/negras                 noir/noire/noirs/noires
any      yellow     amarillo/amarilla/amarillos/amarillas     jaune/jaune/jaunes/jaunes
any      gray       gris/grises                               gris/grise/gris/grises
any      brown      marrón/marrones                           brun/brune/bruns/brunes
animate  happy      feliz/felices                             heureux/heureuse/heureux/heureuses  state
animate  sad        triste/tristes                            triste/triste/tristes/tristes  state
animate  tired      cansado/cansada/cansados/cansadas         fatigué/fatiguée/fatigués/fatiguées  state
animate  hungry     hambriento/hambrienta/hambrientos/hambrientas  affamé/affamée/affamés/affamées  state
animate  young      joven/jóvenes                             jeune/jeune/jeunes/jeunes         before
animate  strong     fuerte/fuertes                            fort/forte/forts/fortes
animate  quiet      tranquilo/tranquila/tranquilos/tranquilas  calme/calme/calmes/calmes
animate  funny      gracioso/graciosa/graciosos/graciosas     drôle/drôle/drôles/drôles
animate  fast       rápido/rápida/rápidos/rápidas             rapide/rapide/rapides/rapides
animate  slow       lento/lenta/lentos/lentas                 lent/lente/lents/lentes
object   heavy      pesado/pesada/pesados/pesadas             lourd/lourde/lourds/lourdes
object   clean      limpio/limpia/limpios/limpias             propre/propre/propres/propres  state
object   dirty      sucio/sucia/sucios/sucias                 sale/sale/sales/sales  state
object   hot        caliente/calientes                        chaud/chaude/chauds/chaudes  state
object   cold       frío/fría/fríos/frías                     froid/froide/froids/froides  state
object   expensive  caro/cara/caros/caras                     cher/chère/chers/chères
object   empty      vacío/vacía/vacíos/vacías                 vide/vide/vides/vides  state
object   round      redondo/redonda/redondos/redondas         rond/ronde/ronds/rondes
object   soft       suave/suaves                              doux/douce/doux/douces
object   broken     roto/rota/rotos/rotas                     cassé/cassée/cassés/cassées  state
"""

# Intransitive verbs, 3rd person singular/plural.   scope: animate (animals and people) or person
_INTRANSITIVE_TABLE = """
animate  sleeps/sleep     duerme/duermen     dort/dorment
animate  eats/eat         come/comen         mange/mangent
animate  runs/run         corre/corren       court/courent
animate  plays/play       juega/juegan       joue/jouent
animate  jumps/jump       salta/saltan       saute/sautent
animate  swims/swim       nada/nadan         nage/nagent
animate  walks/walk       camina/caminan     marche/marchent
animate  waits/wait       espera/esperan     attend/attendent
animate  drinks/drink     bebe/beben         boit/boivent
animate  rests/rest       descansa/descansan  se_repose/se_reposent
person   sings/sing       canta/cantan       chante/chantent
person   works/work       trabaja/trabajan   travaille/travaillent
person   laughs/laugh     ríe/ríen           rit/rient
person   dances/dance     baila/bailan       danse/dansent
person   reads/read       lee/leen           lit/lisent
person   cries/cry        llora/lloran       pleure/pleurent
person   listens/listen   escucha/escuchan   écoute/écoutent
person   cooks/cook       cocina/cocinan     cuisine/cuisinent
"""

# Transitive verbs with a thing or food as object, 1st person singular/plural (I/we).
_TRANSITIVE_TABLE = """
object  want/want        quiero/queremos          veux/voulons
object  see/see          veo/vemos                vois/voyons
object  buy/buy          compro/compramos         achète/achetons
object  have/have        tengo/tenemos            ai/avons
object  find/find        encuentro/encontramos    trouve/trouvons
object  bring/bring      traigo/traemos           apporte/apportons
object  sell/sell        vendo/vendemos           vends/vendons
object  paint/paint      pinto/pintamos           peins/peignons
object  carry/carry      llevo/llevamos           porte/portons
object  take/take        tomo/tomamos             prends/prenons
object  wash/wash        lavo/lavamos             lave/lavons
object  draw/draw        dibujo/dibujamos         dessine/dessinons
"""

# The words the templates themselves use, per language.
_NUMBERS = {
    "en": ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    "es": ("dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve", "diez"),
    "fr": ("deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf", "dix"),
}
# (English, Spanish, French); "on"/"under" need a support noun, the others go with any place or support.
_PREPOSITIONS = {
    "in": ("in", "en", "dans"),
    "on": ("on", "sobre", "sur"),
    "under": ("under", "debajo de", "sous"),
    "near": ("near", "cerca de", "près de"),
    "behind": ("behind", "detrás de", "derrière"),
    "in front of": ("in front of", "delante de", "devant"),
}
_SUPPORT_PREPOSITIONS = ("on", "under", "near", "behind", "in front of")
_PLACE_PREPOSITIONS = ("in", "near", "behind", "in front of")
_DEFINITE = {  # masculine singular, feminine singular, masculine plural, feminine plural
    "en": ("the", "the", "the", "the"),
    "es": ("el", "la", "los", "las"),
    "fr": ("le", "la", "les", "les"),
}
_INDEFINITE = {"en": ("a", "a"), "es": ("un", "una"), "fr": ("un", "une")}  # masculine, feminine
_LOCATIVE = {"en": ("is", "are"), "es": ("está", "están"), "fr": ("est", "sont")}  # Spanish estar: place and state
_COPULA = {"en": ("is", "are"), "es": ("es", "son"), "fr": ("est", "sont")}
_PRONOUNS = {"en": ("I", "we"), "es": ("", ""), "fr": ("je", "nous")}
_WHERE = {"en": "where", "es": "dónde", "fr": "où"}
_THERE_IS = {"en": ("there is", "there are"), "es": ("hay", "hay"), "fr": ("il y a", "il y a")}
_FUNCTION_EXTRAS = {"en": ("an",), "es": ("del",), "fr": ("du", "des")}  # made by a/an and contraction

_FRENCH_ELIDING = {"le": "l'", "la": "l'", "je": "j'", "de": "d'", "se": "s'"}
_CONTRACTIONS = {
    "es": {("de", "el"): "del"},
    "fr": {("de", "le"): "du", ("de", "les"): "des"},
}


def _rows(table: str) -> list[list[str]]:
    return [line.split() for line in table.strip().splitlines()]


def _pair(cell: str) -> tuple[str, str]:
    """ "dort/dorment" -> the two forms; "_" joins words that must stay together (se_repose)."""
    first, second = cell.replace("_", " ").split("/")
    return first, second


@lru_cache(maxsize=1)
def _lexicon() -> tuple[tuple[Noun, ...], tuple[Adjective, ...], tuple[Verb, ...], tuple[Verb, ...]]:
    nouns = tuple(
        Noun(
            kind=row[0],
            forms={"en": _pair(row[1]), "es": _pair(row[2]), "fr": _pair(row[4])},
            gender={"en": "n", "es": row[3], "fr": row[5]},
            support=row[6:] == ["support"],
        )
        for row in _rows(_NOUN_TABLE)
    )
    adjectives = []
    for row in _rows(_ADJECTIVE_TABLE):
        spanish = row[2].split("/")
        if len(spanish) == 2:  # invariable in gender: sg/pl
            spanish = [spanish[0], spanish[0], spanish[1], spanish[1]]
        before = next((flag for flag in row[4:] if flag.startswith("before")), "")
        adjectives.append(
            Adjective(
                scope=row[0],
                forms={"en": (row[1],) * 4, "es": tuple(spanish), "fr": tuple(row[3].split("/"))},
                french_before=bool(before),
                french_vowel_form=before.partition(":")[2] or None,
                state="state" in row[4:],
            )
        )
    intransitive = tuple(
        Verb(row[0], {"en": _pair(row[1]), "es": _pair(row[2]), "fr": _pair(row[3])})
        for row in _rows(_INTRANSITIVE_TABLE)
    )
    transitive = tuple(
        Verb(row[0], {"en": _pair(row[1]), "es": _pair(row[2]), "fr": _pair(row[3])})
        for row in _rows(_TRANSITIVE_TABLE)
    )
    return nouns, tuple(adjectives), intransitive, transitive


# ---------------------------------------------------------------------------------------
# Realisation: noun phrases and sentences in one language


def _starts_with_vowel(word: str) -> bool:
    """French elision and liaison forms: a vowel or a (mute) h; the lexicon avoids aspirated h."""
    first = unicodedata.normalize("NFD", word.lower())[0]
    return first in "aeiouyœh"


def _agree(adjective: Adjective, noun: Noun, plural: bool, lang: str) -> str:
    """The adjective's form for this noun's gender and number."""
    return adjective.forms[lang][(2 if plural else 0) + (noun.gender[lang] == "f")]


@dataclass(frozen=True)
class Phrase:
    """A noun phrase meaning: the noun, an optional adjective, plural or not, and its determiner."""

    noun: Noun
    adjective: Adjective | None
    plural: bool
    determiner: str  # "the", "a" (singular only) or a number 2..10

    def content(self, lang: str) -> list[str]:
        """Noun and adjective in this language's order, without the determiner."""
        noun = self.noun.forms[lang][self.plural]
        if self.adjective is None:
            return [noun]
        adjective = _agree(self.adjective, self.noun, self.plural, lang)
        if lang == "en":
            return [adjective, noun]
        if lang == "fr" and self.adjective.french_before:
            vowel_form = self.adjective.french_vowel_form
            masculine_singular = self.noun.gender[lang] == "m" and not self.plural
            if vowel_form and masculine_singular and _starts_with_vowel(noun):
                adjective = vowel_form
            return [adjective, noun]
        return [noun, adjective]

    def words(self, lang: str) -> list[str]:
        content = self.content(lang)
        return [self._determiner(lang, content[0]), *content]

    def _determiner(self, lang: str, next_word: str) -> str:
        feminine = self.noun.gender[lang] == "f"
        if self.determiner == "the":
            return _DEFINITE[lang][2 * self.plural + feminine]
        if self.determiner == "a":
            if lang == "en" and next_word[0] in "aeiou":
                return "an"
            return _INDEFINITE[lang][feminine]
        return _NUMBERS[lang][int(self.determiner) - 2]


def _finish(words: list[str], lang: str, question: bool = False) -> str:
    """Join words into a sentence: elision, contraction, capital letter, punctuation."""
    tokens = [t for w in words for t in w.split()]
    if lang == "fr":
        tokens = _elide(tokens)
    contractions = _CONTRACTIONS.get(lang, {})
    joined: list[str] = []
    for token in tokens:
        if joined and (joined[-1], token) in contractions:
            joined[-1] = contractions[(joined[-1], token)]
        else:
            joined.append(token)
    text = " ".join(joined)
    text = text[0].upper() + text[1:]
    if question:
        return ("¿" + text if lang == "es" else text) + "?"
    return text + "."


def _elide(tokens: list[str]) -> list[str]:
    out: list[str] = []
    for token in tokens:
        if out and out[-1] in _FRENCH_ELIDING and _starts_with_vowel(token):
            out[-1] = _FRENCH_ELIDING[out[-1]] + token
        else:
            out.append(token)
    return out


# ---------------------------------------------------------------------------------------
# Templates: each draws a meaning and returns its text and content words in every language

Realised = tuple[dict[str, str], dict[str, list[str]]]


def _pick_phrase(rng: random.Random, nouns, adjectives, determiners=("the",), adjective_rate=0.7) -> Phrase:
    noun = rng.choice(nouns)
    determiner = rng.choice(determiners)
    plural = determiner not in ("the", "a") or (determiner == "the" and rng.random() < 0.4)
    fitting = [a for a in adjectives if a.fits(noun)]
    adjective = rng.choice(fitting) if fitting and rng.random() < adjective_rate else None
    return Phrase(noun, adjective, plural, determiner)


_QUANTITIES = ("the", "a", "2", "3", "4", "5", "6", "7", "8", "9", "10")


def _template_action(rng, nouns, adjectives, intransitive, transitive) -> Realised:
    """The small dog sleeps. / El perro pequeño duerme. / Le petit chien dort."""
    verb = rng.choice(intransitive)
    subjects = [n for n in nouns if n.kind == "person" or (verb.scope == "animate" and n.animate)]
    subject = _pick_phrase(rng, subjects, adjectives)
    texts = {lang: _finish(subject.words(lang) + [verb.forms[lang][subject.plural]], lang) for lang in LANGUAGES}
    return texts, {lang: subject.content(lang) for lang in LANGUAGES}


def _template_wish(rng, nouns, adjectives, intransitive, transitive) -> Realised:
    """I want two red apples. / Quiero dos manzanas rojas. / Je veux deux pommes rouges."""
    verb = rng.choice(transitive)
    we = rng.random() < 0.4
    obj = _pick_phrase(rng, [n for n in nouns if n.kind in ("thing", "food")], adjectives, _QUANTITIES)
    texts = {lang: _finish([_PRONOUNS[lang][we], verb.forms[lang][we], *obj.words(lang)], lang) for lang in LANGUAGES}
    return texts, {lang: obj.content(lang) for lang in LANGUAGES}


def _template_location(rng, nouns, adjectives, intransitive, transitive) -> Realised:
    """The cat is under the table. / El gato está debajo de la mesa. / Le chat est sous la table."""
    subject = _pick_phrase(rng, [n for n in nouns if n.kind != "place"], adjectives, adjective_rate=0.5)
    ground_noun = rng.choice([n for n in nouns if n.support or n.kind == "place"])
    preposition = rng.choice(_SUPPORT_PREPOSITIONS if ground_noun.support else _PLACE_PREPOSITIONS)
    ground = Phrase(ground_noun, None, False, "the")
    texts = {}
    for index, lang in enumerate(LANGUAGES):
        words = [*subject.words(lang), _LOCATIVE[lang][subject.plural], _PREPOSITIONS[preposition][index]]
        texts[lang] = _finish(words + ground.words(lang), lang)
    return texts, {lang: subject.content(lang) + ground.content(lang) for lang in LANGUAGES}


def _template_description(rng, nouns, adjectives, intransitive, transitive) -> Realised:
    """The houses are white. / Las casas son blancas. / Les maisons sont blanches."""
    noun = rng.choice(nouns)
    adjective = rng.choice([a for a in adjectives if a.fits(noun)])
    subject = Phrase(noun, None, rng.random() < 0.4, "the")
    texts, keywords = {}, {}
    for lang in LANGUAGES:
        predicate = _agree(adjective, noun, subject.plural, lang)
        copula = (_LOCATIVE if adjective.state else _COPULA)[lang][subject.plural]
        texts[lang] = _finish([*subject.words(lang), copula, predicate], lang)
        keywords[lang] = subject.content(lang) + [predicate]
    return texts, keywords


def _template_question(rng, nouns, adjectives, intransitive, transitive) -> Realised:
    """Where is the old key? / ¿Dónde está la llave vieja? / Où est la vieille clé?"""
    subject = _pick_phrase(rng, [n for n in nouns if n.kind != "place"], adjectives)
    texts = {
        lang: _finish([_WHERE[lang], _LOCATIVE[lang][subject.plural], *subject.words(lang)], lang, question=True)
        for lang in LANGUAGES
    }
    return texts, {lang: subject.content(lang) for lang in LANGUAGES}


def _template_existence(rng, nouns, adjectives, intransitive, transitive) -> Realised:
    """There are three black cats in the garden. / Hay tres gatos negros en el jardín. / Il y a ..."""
    subject = _pick_phrase(rng, [n for n in nouns if n.kind != "place"], adjectives, _QUANTITIES[1:])
    place = Phrase(rng.choice([n for n in nouns if n.kind == "place"]), None, False, "the")
    texts = {}
    for index, lang in enumerate(LANGUAGES):
        words = [_THERE_IS[lang][subject.plural], *subject.words(lang), _PREPOSITIONS["in"][index]]
        texts[lang] = _finish(words + place.words(lang), lang)
    return texts, {lang: subject.content(lang) + place.content(lang) for lang in LANGUAGES}


_TEMPLATES = (
    _template_action,
    _template_wish,
    _template_location,
    _template_description,
    _template_question,
    _template_existence,
)


def generate_sentences(count: int, seed: int) -> list[SentenceTriple]:
    """`count` distinct sentence triples (no text repeats in any language), the same for the same seed.

    Generation is sequential, so a longer list starts with the shorter one: presets of
    different sizes share their first sentences and sentence ids.
    """
    nouns, adjectives, intransitive, transitive = _lexicon()
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    triples: list[SentenceTriple] = []
    attempts = 0
    while len(triples) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(f"cannot draw {count} distinct sentences from the grammar (got {len(triples)})")
        template = rng.choice(_TEMPLATES)
        texts, content = template(rng, nouns, adjectives, intransitive, transitive)
        if any((lang, text) in seen for lang, text in texts.items()):
            continue
        seen.update(texts.items())
        keywords = {lang: tuple(dict.fromkeys(w.lower() for w in words)) for lang, words in content.items()}
        triples.append(SentenceTriple(f"s{len(triples):05d}", texts, keywords))
    return triples


def split_sentences(triples: list[SentenceTriple], valid: int, test: int, seed: int) -> dict[str, list[SentenceTriple]]:
    """Shuffle (seeded) and cut into train / valid / test; the sentences are distinct, so no test
    sentence is ever seen in training, in any language."""
    if valid + test >= len(triples):
        raise ValueError(f"valid ({valid}) + test ({test}) must leave training sentences out of {len(triples)}")
    order = list(triples)
    random.Random(seed + 1).shuffle(order)
    return {"test": order[:test], "valid": order[test : test + valid], "train": order[test + valid :]}


@cache
def vocabulary(lang: str) -> frozenset[str]:
    """Every lowercase word form the grammar can say in `lang` (elided French forms split at the apostrophe)."""
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r}; the grammar speaks {', '.join(LANGUAGES)}")
    index = LANGUAGES.index(lang)
    nouns, adjectives, intransitive, transitive = _lexicon()
    phrases = [
        *(f for n in nouns for f in n.forms[lang]),
        *(f for a in adjectives for f in a.forms[lang]),
        *(a.french_vowel_form for a in adjectives if lang == "fr" and a.french_vowel_form),
        *(f for v in (*intransitive, *transitive) for f in v.forms[lang]),
        *_NUMBERS[lang],
        *(p[index] for p in _PREPOSITIONS.values()),
        *_DEFINITE[lang],
        *_INDEFINITE[lang],
        *_LOCATIVE[lang],
        *_COPULA[lang],
        *_PRONOUNS[lang],
        *_THERE_IS[lang],
        _WHERE[lang],
        *_FUNCTION_EXTRAS[lang],
    ]
    return frozenset(w.lower() for p in phrases for w in p.split())
